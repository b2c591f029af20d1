"""The core's upstream client on the event loop (`[[upstreams]] client = "core"`).

The HTTP exchange with the upstream runs in the core (core/upstream.rs):
connections, TLS, HTTP/1.1 keep-alive and HTTP/2, timeouts, and a stream's
SSE rewrite as its bytes arrive. Python sends a request with one call and gets
its answer as events: the core writes its eventfd once per batch, the loop's
reader drains them all in one call and hands each to its request's `CoreResponse`
(a future for the head, then a queue of the body or the stream's reads).

`CoreResponse` answers what the gateway asks an aiohttp response (status,
headers, content_type, read), and a rewritten stream is read with `batches`.
Failures raise what aiohttp's client raised for the same, so the gateway's
handling is one: TimeoutError for a timeout, `CorePayloadError` (an
aiohttp.ClientPayloadError) for a body cut short, `CoreMalformedError` (one too)
for an answer that broke HTTP (a bad status line or head, bad chunked framing),
`CoreConnectionError` (an aiohttp.ClientConnectionError) for anything else
before the head.

One `UpstreamCore` per event loop (its runtime's threads start with it, so in
each forked worker), shared by that loop's upstreams and closed with the last.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from tierq._core import UpstreamCore

__all__ = ["CoreConnectionError", "CoreMalformedError", "CorePayloadError", "CoreResponse", "CoreUpstreams",
           "SseBatch"]

SseBatch = tuple[bytes, int, int, list[tuple[int, int, bytes]] | None]

_HEAD, _BODY, _CHUNK, _FAILED = 0, 1, 2, 3
# core/upstream.rs `Failure`.
_CONNECT, _TIMEOUT, _BODY_BROKEN, _PROTOCOL, _CLOSED = 0, 1, 2, 3, 4
_FAILURE_NAMES: Final = ("connect", "timeout", "body", "malformed", "closed")


class CoreConnectionError(aiohttp.ClientConnectionError):
    """The core client failed before the upstream's head (connect, TLS, a
    malformed status line or head, the connection closed)."""


class CorePayloadError(aiohttp.ClientPayloadError):
    """The upstream's body broke off after its head (reset, cut short)."""


class CoreMalformedError(aiohttp.ClientPayloadError):
    """The upstream's answer broke HTTP: a bad status line or head, bad chunked framing."""


def _error(failure: int, message: str) -> Exception:
    text = f"upstream {_FAILURE_NAMES[failure] if 0 <= failure < len(_FAILURE_NAMES) else failure}: {message}"
    if failure == _TIMEOUT:
        return TimeoutError(text)
    if failure == _BODY_BROKEN:
        return CorePayloadError(text)
    if failure == _PROTOCOL:
        return CoreMalformedError(text)
    return CoreConnectionError(text)


class CoreResponse:
    """One request's answer as the core reports it; see the module doc."""

    __slots__ = ("_body", "_core", "_events", "_failure", "_head", "_loop", "_over", "_pending",
                 "_waiter", "headers", "id", "sse", "status")

    def __init__(self, core: UpstreamCore, loop: asyncio.AbstractEventLoop, id: int,
                 pending: dict[int, CoreResponse]) -> None:
        self._core = core
        self._pending = pending  # the loop's requests not yet over, this one among them
        self._loop = loop
        self.id = id
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.sse = False  # the body comes as rewritten reads (`batches`)
        self._head: asyncio.Future[None] = loop.create_future()
        self._events: deque[tuple[int, object, object]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: Exception | None = None
        self._over = False  # the core sent this request's last event
        self._body: bytes | None = None  # read() once: kept, as aiohttp keeps it

    # ------------------------------------------------------ fed by CoreUpstreams

    def _event(self, kind: int, a: object, b: object) -> None:
        if kind == _HEAD:
            assert isinstance(a, int) and isinstance(b, tuple)
            self.status = a
            self.headers = CIMultiDictProxy(CIMultiDict(b[0]))
            self.sse = b[1]
            if not self._head.done():
                self._head.set_result(None)
            return
        if kind == _FAILED:
            assert isinstance(a, int) and isinstance(b, str)
            self._over = True
            err = _error(a, b)
            if not self._head.done():
                self._head.set_exception(err)
                return
            self._failure = err
        elif kind == _BODY or (kind == _CHUNK and b is True):
            self._over = True
        self._events.append((kind, a, b))
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------ read by the gateway

    @property
    def content_type(self) -> str:
        """The media type of the body (as aiohttp gives it: lower case, no parameters)."""
        raw = self.headers.get("Content-Type")
        if raw is None:
            return "application/octet-stream"
        return raw.split(";", 1)[0].strip().lower()

    async def _next(self) -> tuple[int, object, object]:
        while not self._events:
            if self._over:  # everything was taken: its failure again, if it failed
                raise self._failure or CorePayloadError("the answer was read already")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    async def read(self) -> bytes:
        """The whole body of an answer that is not a rewritten stream (the same
        bytes again on a second call)."""
        if self._body is not None:
            return self._body
        if self.sse:
            raise RuntimeError("a rewritten stream is read with batches()")
        kind, a, _ = await self._next()
        if kind == _FAILED:
            assert self._failure is not None
            raise self._failure
        assert kind == _BODY and isinstance(a, bytes)
        self._body = a
        return a

    async def batches(self) -> AsyncIterator[tuple[SseBatch, bool]]:
        """A rewritten stream's reads, as `SseRewriter.feed` gives them, each with
        whether it is the last (the body ended, [DONE] came, or an event
        outgrew the bound). Raises the stream's failure where it came."""
        while True:
            kind, a, b = await self._next()
            if kind == _FAILED:
                assert self._failure is not None
                raise self._failure
            assert kind == _CHUNK and isinstance(b, bool)
            yield a, b  # type: ignore[misc]
            if b:
                return

    def ack(self, nbytes: int) -> None:
        """The client was sent `nbytes` more of the core's bytes: its reads go on."""
        if not self._over:
            self._core.ack(self.id, nbytes)

    def release(self) -> None:
        """The gateway is done with it: a request not yet over is dropped in the
        core, which closes its connection (an abandoned stream stops there)."""
        if not self._over:
            self._over = True
            self._pending.pop(self.id, None)
            self._core.cancel(self.id)


class _Post(AbstractAsyncContextManager["CoreResponse"]):
    """`async with upstreams.post(...) as resp:` for one request."""

    __slots__ = ("_resp",)

    def __init__(self, resp: CoreResponse) -> None:
        self._resp = resp

    async def __aenter__(self) -> CoreResponse:
        try:
            await self._resp._head
        except BaseException:
            self._resp.release()
            raise
        return self._resp

    async def __aexit__(self, *exc: object) -> None:
        self._resp.release()


class CoreUpstreams:
    """The loop's client: one `UpstreamCore`, its eventfd watched by the loop."""

    _by_loop: dict[asyncio.AbstractEventLoop, CoreUpstreams] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._core = UpstreamCore(1)
        self._pending: dict[int, CoreResponse] = {}
        self._users = 0
        loop.add_reader(self._core.fd, self._ready)

    @classmethod
    def attach(cls) -> CoreUpstreams:
        """The running loop's client (made on first use), counted as one more user."""
        loop = asyncio.get_running_loop()
        self = cls._by_loop.get(loop)
        if self is None:
            self = cls._by_loop[loop] = CoreUpstreams(loop)
        self._users += 1
        return self

    def detach(self) -> None:
        """One user less; the last one stops watching the fd (the runtime goes
        with the object: its requests are dropped, their connections closed)."""
        self._users -= 1
        if self._users == 0:
            self._loop.remove_reader(self._core.fd)
            self._by_loop.pop(self._loop, None)
            for resp in self._pending.values():
                resp._event(_FAILED, _CONNECT, "the client was closed")
            self._pending.clear()

    def add_client(self, connect_timeout_s: float, read_timeout_s: float | None,
                   max_connections: int, ca_pem: bytes | None) -> int:
        return self._core.add_client(connect_timeout_s, read_timeout_s, None, max_connections,
                                     ca_pem)

    def post(self, client: int, url: str, headers: list[tuple[str, str]], body: bytes,
             stream: tuple[str, bool, int] | None) -> _Post:
        id = self._core.send(client, url, headers, body, stream)
        resp = self._pending[id] = CoreResponse(self._core, self._loop, id, self._pending)
        return _Post(resp)

    @property
    def in_flight(self) -> int:
        return self._core.in_flight

    def _ready(self) -> None:
        pending = self._pending
        for id, kind, a, b in self._core.drain():
            resp = pending.get(id)
            if resp is None:
                continue  # dropped by the gateway before this event was read
            resp._event(kind, a, b)
            if resp._over:
                del pending[id]
