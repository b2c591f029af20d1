"""Talking to upstream engines: pooled connections and request rewriting.

`UpstreamClient` owns one pooled aiohttp.ClientSession per upstream (keep-alive,
never following redirects, bounded connect and read time, managed or
client-supplied credential). `rewrite_request` turns a client body into the
body an upstream of a given kind accepts, with the applied tier in its terms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import yarl
from aiohttp.http_exceptions import TransferEncodingError

from tierq.config import UpstreamConfig
from tierq.health import Health
from tierq.routing import Router
from tierq.tiers import Tier
from tierq.upstream_core import CoreMalformedError, CoreResponse, CoreUpstreams

__all__ = [
    "BYO_HEADER",
    "ENGINE_PRIORITY",
    "RewriteInfo",
    "FORWARD_ENDPOINTS",
    "UpstreamClient",
    "malformed_answer",
    "match_forward_target",
    "rewrite_request",
]

log = logging.getLogger("tierq.upstream")

# How aiohttp's client says a body broke off (the connection lost before its
# end), as opposed to bad framing found in the bytes it read.
_CUT_SHORT: Final = "Response payload is not completed"


def malformed_answer(e: BaseException) -> bool:
    """Whether a failed exchange is the upstream's answer breaking HTTP (a bad
    status line or head, bad chunked framing: 502 `upstream_error`), on either
    client, rather than the upstream out of reach (refused, reset, cut short,
    timed out: `upstream_unavailable` / `upstream_timeout`). docs/errors.md."""
    if isinstance(e, CoreMalformedError):
        return True
    # aiohttp: a head it cannot parse is a ClientResponseError (the gateway never
    # calls raise_for_status); bad chunked framing a ClientPayloadError raised
    # from its TransferEncodingError (a chunked body cut short is one too, but
    # raised on the lost connection, with _CUT_SHORT).
    if type(e) is aiohttp.ClientResponseError:
        return True
    return (isinstance(e, aiohttp.ClientPayloadError)
            and isinstance(e.__cause__, TransferEncodingError)
            and not str(e).startswith(_CUT_SHORT))


# Endpoints reachable through /v1/forward (the rest of the target's path).
FORWARD_ENDPOINTS: Final = frozenset({"chat/completions", "completions", "embeddings"})

# Bring-your-own key: a client of an upstream without a managed credential
# passes its own upstream key here ("Bearer sk-..." or the bare key);
# `Authorization` carries the tierq key and is never forwarded.
BYO_HEADER: Final = "x-upstream-authorization"

# The applied tier in each engine's own terms, sent only when the upstream is
# declared with priority_scheduling = true (an engine without priority
# scheduling rejects a non-default value: vLLM errors on priority != 0).
#   vLLM `priority`: int, lower runs first, 0 is the engine default. Priority
#     gets -10, leaving room for operators to slot their own levels between.
#   SGLang `priority`: int, higher first by default
#     (--schedule-low-priority-values-first flips it): 10 vs 0.
#   TensorRT-LLM `priority`: float in [0, 1], higher first, engine default 0.5.
# Flex runs after default in every engine (it only ever holds idle slots, but
# inside an engine's own batch queue it should not delay a default request).
# The sim validates vLLM's int form, so it stands in for a vLLM engine.
ENGINE_PRIORITY: Final[dict[str, dict[Tier, int | float]]] = {
    "vllm": {Tier.PRIORITY: -10, Tier.DEFAULT: 0, Tier.FLEX: 10},
    "sim": {Tier.PRIORITY: -10, Tier.DEFAULT: 0, Tier.FLEX: 10},
    "sglang": {Tier.PRIORITY: 10, Tier.DEFAULT: 0, Tier.FLEX: -10},
    "trtllm": {Tier.PRIORITY: 1.0, Tier.DEFAULT: 0.5, Tier.FLEX: 0.0},
}


@dataclass(frozen=True, slots=True)
class RewriteInfo:
    stream: bool
    # Whether the client itself asked for stream_options.include_usage: the
    # gateway always asks the upstream for it (streams are billed from real
    # usage) and strips the usage-only chunk when the client did not.
    client_wants_usage: bool


def rewrite_request(
    body: dict[str, Any],
    *,
    kind: str,
    priority_scheduling: bool,
    applied_tier: Tier,
    endpoint: str,
    upstream_model: str,
) -> RewriteInfo:
    """Rewrite a parsed client body in place for the upstream; see module doc.

    - `model` becomes the upstream's name for the model;
    - the client's `service_tier` is never forwarded as sent: kind "openai"
      with priority_scheduling gets "priority" only when priority was applied
      (so a hosted provider bills its premium only when tierq does); every
      engine kind gets none (TensorRT-LLM rejects unknown fields, vLLM warns);
    - a client-supplied engine `priority` is dropped (priority is bought with
      the tier, not set directly); with priority_scheduling the engine gets the
      applied tier in its terms (chat and completions; for embeddings only
      vLLM/sim take it);
    - streams always ask for stream_options.include_usage.
    """
    body["model"] = upstream_model
    body.pop("service_tier", None)
    body.pop("priority", None)
    if priority_scheduling:
        if kind == "openai":
            if applied_tier == Tier.PRIORITY:
                body["service_tier"] = Tier.PRIORITY.value
        elif kind in ENGINE_PRIORITY and (endpoint != "embeddings" or kind in ("vllm", "sim")):
            body["priority"] = ENGINE_PRIORITY[kind][applied_tier]
    stream = body.get("stream") is True
    client_wants_usage = False
    if stream:
        opts = body.get("stream_options")
        if isinstance(opts, dict):
            client_wants_usage = opts.get("include_usage") is True
            body["stream_options"] = {**opts, "include_usage": True}
        else:
            body["stream_options"] = {"include_usage": True}
    return RewriteInfo(stream, client_wants_usage)


class UpstreamClient:
    """One upstream: its endpoints (replicas; `base_url` is the first),
    credential and a pooled session per endpoint, each bounded by `pool_size`
    connections; its `router` orders a request's replicas (tierq.routing).
    With `client = "core"` the core's client (tierq.upstream_core) does the
    same: one client per endpoint, each bounded by `pool_size`.

    Call `start()` inside the event loop that will use it and `close()` at
    shutdown (the app does both in its cleanup context). An upstream of kind
    "sim" learns its addresses there, once its backends run.
    """

    def __init__(self, config: UpstreamConfig, base_url: str, pool_size: int) -> None:
        self.config = config
        self.name = config.name
        self.endpoints: tuple[str, ...] = tuple(e.rstrip("/") for e in config.endpoints) \
            or (base_url.rstrip("/"),)
        self.pool_size = max(1, pool_size)
        self._sessions: list[aiohttp.ClientSession] = []
        self._core: CoreUpstreams | None = None  # client "core": the loop's
        self._core_clients: list[int] = []  # per endpoint, its client in it
        self._core_headers: list[tuple[str, str]] = []  # _session_headers, as pairs
        self._urls: dict[tuple[int, str], yarl.URL] = {}
        self.router = Router(self.endpoints, config.routing)
        # With several endpoints, each one's health (tierq.health): which a
        # request may be routed to, fed by the request path and the probes.
        self.health: Health | None = None
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        # Read once at start-up; never logged, never put in the ledger.
        self._managed_auth = f"Bearer {key}" if key else None
        self.managed = config.api_key_env is not None

    @property
    def base_url(self) -> str:
        return self.endpoints[0]

    async def start(self, base_url: str | Sequence[str] | None = None) -> None:
        """`base_url`: the address(es) of a sim upstream's backends, known now."""
        if base_url is not None:
            urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
            self.endpoints = tuple(u.rstrip("/") for u in urls)
            self.router = Router(self.endpoints, self.config.routing)
            self._urls.clear()
        if self.managed and self._managed_auth is None:
            log.warning("upstream %s: $%s is not set; requests go without a credential",
                        self.name, self.config.api_key_env)
        # Health is the endpoints', whichever client sends to them.
        if len(self.endpoints) > 1 and (self.health is None or self.health.replicas != len(self.endpoints)):
            self.health = Health(len(self.endpoints), self.config.health)
        if self.config.client == "core":
            self._start_core()
            return
        self._sessions = [self._new_session() for _ in self.endpoints]

    def _start_core(self) -> None:
        ca_pem = None
        if self.config.ca_file is not None:
            with open(self.config.ca_file, "rb") as f:
                ca_pem = f.read()
        core = CoreUpstreams.attach()
        try:
            self._core_clients = [
                core.add_client(self.config.connect_timeout_s, self.config.read_timeout_s,
                                self.pool_size, ca_pem)
                for _ in self.endpoints]
        except BaseException:
            core.detach()
            raise
        self._core = core
        self._core_headers = list(self._session_headers().items())

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            # Every admitted request holds one connection, so the pool is sized
            # from the admission limits of the models this upstream serves
            # (per endpoint: each replica has its own limit).
            limit=self.pool_size,
            limit_per_host=self.pool_size,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
        )
        # TCP_NODELAY: aiohttp sets it on every connection it makes
        # (BaseProtocol.connection_made calls tcp_nodelay(transport, True)), so
        # small SSE chunks are not held back by Nagle's algorithm.
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.config.connect_timeout_s,
                sock_read=self.config.read_timeout_s,
            ),
            # The gateway forwards bytes and parses JSON itself; decompressing is
            # left on so a gzip-ing upstream still yields JSON.
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
            headers=self._session_headers(),
        )

    async def close(self) -> None:
        if self._core is not None:
            self._core.detach()
            self._core = None
        sessions, self._sessions = self._sessions, []
        for session in sessions:
            await session.close()

    @property
    def started(self) -> bool:
        return bool(self._sessions) or self._core is not None

    def url(self, endpoint: str, replica: int = 0) -> str:
        """The upstream URL of an endpoint such as "chat/completions" on a replica."""
        return f"{self.endpoints[replica]}/{endpoint}"

    def _session_headers(self) -> dict[str, str]:
        """Headers every request to this upstream carries (set once on the session)."""
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self._managed_auth is not None:
            h["Authorization"] = self._managed_auth
        return h

    def _request_headers(self, client_upstream_auth: str | None,
                         trace: dict[str, str] | None) -> dict[str, str] | None:
        """The client's own credential (bring your own key), when this upstream is
        unmanaged; the trace context (traceparent), when the request has one."""
        if self.managed or not client_upstream_auth:
            return trace
        value = client_upstream_auth.strip()
        h = {"Authorization": value if value.lower().startswith("bearer ") else f"Bearer {value}"}
        if trace is not None:
            h.update(trace)
        return h

    def post(
        self, endpoint: str, body: bytes, client_upstream_auth: str | None,
        trace: dict[str, str] | None = None, replica: int = 0, *,
        stream: tuple[str, bool, int] | None = None,
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse | CoreResponse]:
        """POST a JSON body to a replica: `async with client.post(...) as resp:`.
        `trace`: the W3C trace context headers to send ([tracing], tierq.tracing).
        `stream`: (applied tier, client wants usage, max event bytes) for a
        streamed request; the core client rewrites a 2xx event stream with them
        (`CoreResponse.sse`), aiohttp's ignores it.

        Leaving the block before the body is read closes the connection, which
        is how an abandoned stream cancels the upstream's generation.
        """
        if self._core is not None:
            headers = self._core_headers
            extra = self._request_headers(client_upstream_auth, trace)
            if extra:
                lowered = {k.lower() for k in extra}
                headers = [h for h in headers if h[0].lower() not in lowered] + list(extra.items())
            # Never a redirect followed (the core's policy), as below.
            return self._core.post(self._core_clients[replica], self.url(endpoint, replica),
                                   headers, body, stream)
        if not self._sessions:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        url = self._urls.get((replica, endpoint))
        if url is None:  # parsed once per endpoint, not once per request
            url = self._urls[(replica, endpoint)] = yarl.URL(self.url(endpoint, replica))
        return self._sessions[replica].post(
            url,
            data=body,
            headers=self._request_headers(client_upstream_auth, trace),
            # An upstream redirect is never followed: it could point anywhere,
            # and the credential would follow it.
            allow_redirects=False,
        )


def match_forward_target(target: str, bases: Mapping[str, str | Sequence[str]]) -> tuple[str, str] | None:
    """(upstream name, endpoint) if `target` lies under a configured base URL
    (or any of an upstream's endpoints; the request is then routed among them
    as any other: the upstream is pinned, not the replica).

    The target must have the base's scheme, its host exactly as written (no
    resolution, so no IP or alias of it), its port, and its path followed by
    "/" and one of FORWARD_ENDPOINTS. Anything ambiguous (credentials, query,
    fragment, dot segments, encoded slashes or backslashes) is refused, so
    what is checked is exactly what is connected to. None means 403.
    """
    if not target or any(c in target for c in "\\@#?") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        return None
    lowered = target.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered:
        return None
    try:
        # yarl parses the authority lazily: a bad port raises on first access.
        url = yarl.URL(target, encoded=True)
        absolute, host, port, scheme, path = (url.absolute, url.raw_host, url.port, url.scheme,
                                              url.raw_path)
    except ValueError:
        return None
    if not absolute or host is None:
        return None
    for name, given in bases.items():
        for base in (given,) if isinstance(given, str) else given:
            if not base:
                continue
            b = yarl.URL(base, encoded=True)
            if scheme != b.scheme or host.lower() != (b.raw_host or "").lower():
                continue
            if port != b.port:
                continue
            prefix = b.raw_path.rstrip("/") + "/"
            if not path.startswith(prefix):
                continue
            endpoint = path[len(prefix):]
            if endpoint in FORWARD_ENDPOINTS:
                return name, endpoint
    return None
